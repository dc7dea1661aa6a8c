//! Similar blocks elsewhere in DST (capability `CAP_SIMILAR`): random
//! images whose new blocks land where the old copy had zeros, some of them
//! edited copies of old blocks elsewhere (a rewritten file in free space),
//! copied onto the old copy through a relay that can hide the capability
//! (a peer of the previous release), lie in the target's signatures, damage
//! the source's deltas or answer sketches nobody asked for.

mod common;
#[path = "common/relay.rs"]
mod relay;

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use relay::{chain, hide, keep, Edit, Outcome};
use xenmig::copy::target::TargetOptions;
use xenmig::copy::Report;
use xenmig::storage::disk::Disk;
use xenmig::storage::image::Image;
use xenmig::wire::protocol::{Message, CAP_SHORT_SUB_HASHES, CAP_SIMILAR, CAP_SUB_DELTA};
use xenmig::wire::sketch::{self, Index};
use xenmig::wire::subdelta;

const BS: usize = 4096;

/// Copy through the relay, with the 4-byte sub-block hashes of `FetchDelta` (`CAP_SHORT_SUB_HASHES`
/// hidden both ways, the exchange a peer of the previous release gets): a
/// 4-byte hash matches by chance once in 2^32 sub-blocks, so every failed
/// delta here is one the test caused.
///
/// The index is built whatever the link: in-process links are fast, and a
/// fast link builds none (`a_fast_link_builds_no_index`).
fn copy_through(src: &Path, dst: &Path, codec: &str, to_target: Edit, to_source: Edit) -> Outcome {
    copy_judged(src, dst, codec, true, to_target, to_source)
}

/// [`copy_through`], the index built `always`, or only where the link is
/// judged slow.
fn copy_judged(src: &Path, dst: &Path, codec: &str, always: bool, to_target: Edit, to_source: Edit) -> Outcome {
    let (to_target, to_source) =
        (chain(hide(CAP_SHORT_SUB_HASHES), to_target), chain(hide(CAP_SHORT_SUB_HASHES), to_source));
    let topts = TargetOptions { always_index_similar: always, ..relay::target_options() };
    relay::copy_onto(src, dst, &relay::source_options(BS as u32, codec), topts, to_target, to_source)
}

/// What a block of the new image's second half (zeros in the old copy) is.
#[derive(Clone, Copy, Debug)]
enum Far {
    Zero,
    /// Old block `n` (modulo the first half) with `len` bytes at `at` changed.
    Moved {
        n: u16,
        at: u16,
        len: u16,
    },
    /// New content.
    Fresh,
}

fn far() -> impl Strategy<Value = Far> {
    prop_oneof![
        1 => Just(Far::Zero),
        4 => (any::<u16>(), any::<u16>(), 1u16..600).prop_map(|(n, at, len)| Far::Moved { n, at, len }),
        2 => Just(Far::Fresh),
    ]
}

/// The old image (`half` noise blocks, then as many zero blocks), the new
/// one (the same first half, then `fars`), and how many far blocks the
/// target finds a similar block for: those whose sketch shares a
/// super-feature with an old block (what `Index::best` finds, as the
/// target's index of DST's unchanged first half holds).
fn images(seed: u64, half: usize, fars: &[Far]) -> (Vec<u8>, Vec<u8>, u64) {
    let olds: Vec<Vec<u8>> = (0..half).map(|i| common::noise(seed ^ (i as u64 * 7919 + 1), BS)).collect();
    let mut old: Vec<u8> = olds.concat();
    let mut new = old.clone();
    old.extend(vec![0u8; fars.len() * BS]);
    let mut index = Index::new(usize::MAX);
    for (i, b) in olds.iter().enumerate() {
        index.insert(i as u64, &sketch::sketch(b).unwrap());
    }
    let mut similar = 0;
    for (k, f) in fars.iter().enumerate() {
        let b = match *f {
            Far::Zero => vec![0u8; BS],
            Far::Moved { n, at, len } => {
                let mut b = olds[n as usize % half].clone();
                let at = at as usize % BS;
                for x in &mut b[at..(at + len as usize).min(BS)] {
                    *x ^= 0xa5;
                }
                b
            }
            Far::Fresh => common::noise(!seed ^ (k as u64 * 104_729), BS),
        };
        // (A block twice would be one fetch and one reuse: keep them distinct.)
        let b = if b.iter().any(|&x| x != 0) && new.chunks(BS).any(|c| c == &b[..]) {
            common::noise(!seed ^ (k as u64 * 104_729), BS)
        } else {
            b
        };
        if b.iter().any(|&x| x != 0)
            && !olds.contains(&b)
            && index.best(&sketch::sketch(&b).unwrap(), |_| true).is_some()
        {
            similar += 1;
        }
        new.extend(b);
    }
    (old, new, similar)
}

fn counted(rep: &Report, len: usize) -> Result<(), TestCaseError> {
    prop_assert!(rep.verified);
    prop_assert_eq!(rep.blocks_total, rep.blocks_zero + rep.blocks_reused + rep.blocks_fetched);
    prop_assert_eq!(rep.blocks_total, (len as u64).div_ceil(BS as u64));
    prop_assert!(rep.blocks_similar <= rep.blocks_delta && rep.blocks_delta <= rep.blocks_fetched);
    prop_assert_eq!(rep.bytes_fetched, rep.codecs.values().sum::<u64>());
    Ok(())
}

/// Counts the frames of kind `k` passing.
fn count_kind(k: xenmig::wire::protocol::Kind, n: Arc<AtomicUsize>) -> Edit {
    Box::new(move |m| {
        if m.kind() == k {
            n.fetch_add(1, Ordering::SeqCst);
        }
        m
    })
}

/// A target that lies: each signature is that of the source's own block,
/// so the source sends nothing and the target rebuilds the block it chose.
fn lying_signatures(src: Vec<u8>) -> Edit {
    Box::new(move |m| match m {
        Message::FetchDelta { block, .. } => {
            let at = block as usize * BS;
            Message::FetchDelta { block, sig: subdelta::signature(&src[at..(at + BS).min(src.len())]) }
        }
        m => m,
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]

    /// With the capability on both ends or hidden on either: byte-identical,
    /// counted, and every far block with a similar block in DST went as a
    /// delta against it exactly when both ends have it.
    #[test]
    fn similar_blocks_rebuild_the_image_and_are_counted(
        seed in any::<u64>(),
        half in 1usize..40,
        fars in proptest::collection::vec(far(), 1..40),
        codec in prop_oneof![Just("none"), Just("zstd:1"), Just("zstd"), Just("auto")],
        hidden in 0u8..4,
    ) {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (d.path().join("a"), d.path().join("b"));
        let (old, new, similar) = images(seed, half, &fars);
        fs::write(&a, &new).unwrap();
        fs::write(&b, &old).unwrap();
        let (to_target, to_source) = match hidden {
            0 => (keep(), keep()),
            // A source without it: the target sees no bit and never asks.
            1 => (hide(CAP_SIMILAR), keep()),
            // A target without it neither sets it nor asks: hidden both ways.
            2 => (hide(CAP_SIMILAR), hide(CAP_SIMILAR)),
            // Sketches without deltas are not used.
            _ => (hide(CAP_SUB_DELTA), keep()),
        };
        let o = copy_through(&a, &b, codec, to_target, to_source);
        let rep = o.source.unwrap();
        prop_assert!(o.target.unwrap().verified);
        prop_assert_eq!(fs::read(&b).unwrap(), new.clone());
        counted(&rep, new.len())?;
        prop_assert_eq!(rep.deltas_failed, 0);
        prop_assert_eq!(rep.blocks_similar, if hidden == 0 { similar } else { 0 }, "{:?}", rep);
    }

    /// In place, old places that the copy rewrites (small edits, as
    /// deltas against themselves) still serve the far blocks as bases:
    /// their old bytes are kept aside before the first write, so every far
    /// block with a similar block in the old copy goes as a delta against
    /// it, whichever places were rewritten and in whatever order.
    #[test]
    fn old_places_rewritten_in_the_copy_still_serve_as_bases(
        seed in any::<u64>(),
        half in 1usize..40,
        fars in proptest::collection::vec(far(), 1..40),
        edits in proptest::collection::vec(proptest::option::of((any::<u16>(), 1u16..64)), 40),
        codec in prop_oneof![Just("none"), Just("zstd"), Just("auto")],
    ) {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (d.path().join("a"), d.path().join("b"));
        let (old, mut new, similar) = images(seed, half, &fars);
        for (i, e) in edits.iter().take(half).enumerate() {
            if let Some((at, len)) = *e {
                let at = i * BS + at as usize % BS;
                for x in &mut new[at..(at + len as usize).min((i + 1) * BS)] {
                    *x ^= 0x5a;
                }
            }
        }
        fs::write(&a, &new).unwrap();
        fs::write(&b, &old).unwrap();
        let rep = copy_through(&a, &b, codec, keep(), keep()).target.unwrap();
        prop_assert_eq!(fs::read(&b).unwrap(), new.clone());
        counted(&rep, new.len())?;
        prop_assert_eq!(rep.deltas_failed, 0);
        prop_assert_eq!(rep.blocks_similar, similar, "{:?}", rep);
    }

    /// Signatures that do not fit the candidate (a lying target, or a
    /// candidate rewritten after it was signed): every rebuilt block misses
    /// its key and is fetched whole; the copy is still byte-identical.
    #[test]
    fn a_wrong_signature_costs_a_refetch_never_a_wrong_block(
        seed in any::<u64>(),
        half in 1usize..20,
        fars in proptest::collection::vec(far(), 1..24),
        codec in prop_oneof![Just("none"), Just("zstd:1")],
    ) {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (d.path().join("a"), d.path().join("b"));
        let (old, new, similar) = images(seed, half, &fars);
        fs::write(&a, &new).unwrap();
        fs::write(&b, &old).unwrap();
        let o = copy_through(&a, &b, codec, keep(), lying_signatures(new.clone()));
        let rep = o.target.unwrap();
        prop_assert_eq!(fs::read(&b).unwrap(), new.clone());
        counted(&rep, new.len())?;
        prop_assert_eq!(rep.blocks_similar, 0);
        prop_assert_eq!(rep.deltas_failed, similar);
    }
}

/// Blocks moved with small edits (a file rewritten elsewhere): each is
/// found and sent as a delta against its old copy, so far fewer bytes
/// travel than the blocks themselves.
#[test]
fn moved_blocks_go_as_deltas_against_their_old_copy() {
    let fars: Vec<Far> = (0..32).map(|n| Far::Moved { n, at: 100 + 97 * n, len: 20 }).collect();
    let d = tempfile::tempdir().unwrap();
    let (a, b) = (d.path().join("a"), d.path().join("b"));
    let (old, new, similar) = images(7, 32, &fars);
    assert_eq!(similar, 32, "a 20-byte edit should keep a super-feature of these blocks");
    fs::write(&a, &new).unwrap();
    fs::write(&b, &old).unwrap();
    let o = copy_through(&a, &b, "none", keep(), keep());
    let rep = o.target.unwrap();
    assert!(fs::read(&b).unwrap() == new, "the copy differs");
    assert_eq!((rep.blocks_fetched, rep.blocks_similar, rep.deltas_failed), (32, 32, 0));
    // Each delta: a bitmap and at most two 512-byte sub-blocks of 4 KiB.
    assert!(rep.bytes_fetched <= 32 * (1 + 2 * 512), "{} bytes fetched", rep.bytes_fetched);
}

/// A file rewritten elsewhere on a guest whose old place then took new
/// data, written in `dir`: the new image as `a`, the old one (32 blocks,
/// then zeros) as `r`; the new one has 32 fresh blocks there, then edited
/// copies of the 32 old ones. Returns the paths and both images.
fn rewritten_elsewhere(dir: &Path) -> (PathBuf, PathBuf, Vec<u8>, Vec<u8>) {
    let fars: Vec<Far> = (0..32).map(|n| Far::Moved { n, at: 100 + 97 * n, len: 20 }).collect();
    let (old, mut new, similar) = images(7, 32, &fars);
    assert_eq!(similar, 32);
    new[..32 * BS].copy_from_slice(&common::noise(99, 32 * BS));
    let (a, r) = (dir.join("a"), dir.join("r"));
    fs::write(&a, &new).unwrap();
    fs::write(&r, &old).unwrap();
    (a, r, old, new)
}

/// Copy `src` to the new `dst` with `base` as its reference (laid out
/// alike: DST is filled from it), the index built whatever the link.
fn copy_from_base(src: &Path, dst: &Path, base: &Path, to_source: Edit) -> Outcome {
    let topts =
        TargetOptions { always_index_similar: true, references: vec![base.to_path_buf()], ..relay::target_options() };
    let (to_target, to_source) = (hide(CAP_SHORT_SUB_HASHES), chain(hide(CAP_SHORT_SUB_HASHES), to_source));
    relay::copy_onto(src, dst, &relay::source_options(BS as u32, "none"), topts, to_target, to_source)
}

/// A new DST filled from its base looks for similar blocks in the base,
/// which keeps every old block: the moved blocks come as deltas against
/// the old places that DST rewrites in the same group. In place, the
/// target keeps those places' old bytes aside before it rewrites them
/// (`copy::kept`), and the moved blocks lean on them just the same, even
/// where a place is rewritten before the index or the delta reads it.
#[test]
fn similar_blocks_lean_on_old_places_that_dst_rewrites() {
    let d = tempfile::tempdir().unwrap();
    let b = d.path().join("b");
    let (a, r, old, new) = rewritten_elsewhere(d.path());
    let rep = copy_from_base(&a, &b, &r, keep()).target.unwrap();
    assert!(fs::read(&b).unwrap() == new, "the copy differs");
    assert!(fs::read(&r).unwrap() == old, "the base is only read");
    assert_eq!((rep.blocks_similar, rep.deltas_failed, rep.blocks_in_place), (32, 0, 0), "{rep:?}");
    let inplace = d.path().join("inplace");
    fs::write(&inplace, &old).unwrap();
    let rep = copy_through(&a, &inplace, "none", keep(), keep()).target.unwrap();
    assert!(fs::read(&inplace).unwrap() == new, "the copy in place differs");
    assert_eq!((rep.blocks_similar, rep.deltas_failed), (32, 0), "{rep:?}");
}

/// The base rewritten once the target asked its first delta against it
/// (after it read the old block for the signature):
/// every delta against the base rebuilds a block that fails its key and
/// is fetched whole. Never a wrong block, and DST (filled before) is not
/// touched by the change.
#[test]
fn a_base_rewritten_under_its_deltas_costs_refetches_never_a_wrong_block() {
    use std::os::unix::fs::FileExt;
    let d = tempfile::tempdir().unwrap();
    let b = d.path().join("b");
    let (a, r, _, new) = rewritten_elsewhere(d.path());
    let path = r.clone();
    let mut done = false;
    let rewrite: Edit = Box::new(move |m| {
        // (Blocks 32 on are the moved ones: deltas against the base.)
        if matches!(m, Message::FetchDelta { block, .. } if block >= 32) && !done {
            let f = fs::OpenOptions::new().write(true).open(&path).unwrap();
            f.write_all_at(&common::noise(5, 32 * BS), 0).unwrap();
            done = true;
        }
        m
    });
    let rep = copy_from_base(&a, &b, &r, rewrite).target.unwrap();
    assert!(fs::read(&b).unwrap() == new, "the copy differs");
    assert!(rep.verified);
    assert_eq!(rep.blocks_total, rep.blocks_zero + rep.blocks_reused + rep.blocks_fetched);
    assert!(rep.deltas_failed > 0 && rep.blocks_similar < 32, "{rep:?}");
}

/// A new DST (all zeros) holds nothing similar: no sketch is asked for, and
/// the blocks go whole.
#[test]
fn a_new_dst_asks_for_no_sketches() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = (d.path().join("a"), d.path().join("b"));
    let new = common::noise(3, 64 * BS);
    fs::write(&a, &new).unwrap();
    fs::write(&b, vec![0u8; 64 * BS]).unwrap();
    let asked = Arc::new(AtomicUsize::new(0));
    let o = copy_through(&a, &b, "zstd", keep(), count_kind(xenmig::wire::protocol::Kind::WantSketches, asked.clone()));
    let rep = o.target.unwrap();
    assert!(fs::read(&b).unwrap() == new, "the copy differs");
    assert_eq!((rep.blocks_fetched, rep.blocks_delta), (64, 0));
    assert_eq!(asked.load(Ordering::SeqCst), 0);
}

/// Sketches nobody asked for (another first block than asked) fail the
/// copy with an error naming them, before any block is written from them.
#[test]
fn sketches_not_asked_for_are_refused() {
    let fars: Vec<Far> = (0..4).map(|n| Far::Moved { n, at: 10, len: 5 }).collect();
    let d = tempfile::tempdir().unwrap();
    let (a, b) = (d.path().join("a"), d.path().join("b"));
    let (old, new, _) = images(11, 4, &fars);
    fs::write(&a, &new).unwrap();
    fs::write(&b, &old).unwrap();
    let shift: Edit = Box::new(|m| match m {
        Message::Sketches { first_block, sketches } => Message::Sketches { first_block: first_block + 1, sketches },
        m => m,
    });
    let o = copy_through(&a, &b, "none", shift, keep());
    let e = o.target.unwrap_err().to_string();
    assert!(e.contains("sketches of blocks 5+4, which were not asked for"), "{e}");
    assert!(o.source.is_err());
    // DST is the old copy, or blocks of the new one: never anything else.
    let got = fs::read(&b).unwrap();
    for (i, blk) in got.chunks(BS).enumerate() {
        assert!(blk == &new[i * BS..(i + 1) * BS] || blk == &old[i * BS..(i + 1) * BS], "block {i}");
    }
}

/// Moved blocks (similar to old ones) where the old copy had zeros, then
/// `tail` blocks with their first KiB changed: the moved blocks wait for
/// the index while the tail's deltas (a KiB each) are on their way.
fn moved_then_tail(tail: usize) -> (Vec<u8>, Vec<u8>) {
    let fars: Vec<Far> = (0..32).map(|n| Far::Moved { n, at: 100 + 97 * n, len: 20 }).collect();
    let (mut old, mut new, similar) = images(7, 224, &fars);
    assert_eq!(similar, 32);
    let t = common::noise(8, tail * BS);
    let mut changed = t.clone();
    for b in changed.chunks_mut(BS) {
        b[..1024].iter_mut().for_each(|x| *x ^= 0x3c);
    }
    old.extend(t);
    new.extend(changed);
    (old, new)
}

/// Hold each block-carrying frame as long as `rate` bytes a second take.
fn throttle(rate: f64) -> Edit {
    Box::new(move |m| {
        let len = match &m {
            Message::Blocks { payload, .. } | Message::Delta { payload, .. } | Message::Deltas { payload, .. } => {
                payload.len()
            }
            _ => 0,
        };
        std::thread::sleep(Duration::from_secs_f64(len as f64 / rate));
        m
    })
}

/// Judged by the link (the default): on a fast link the moved blocks are
/// fetched whole and nothing is indexed; on a slow one (400 kB/s, the
/// tail's deltas take most of a second) the index is built while the
/// tail's answers arrive, and they go as deltas against their old copies.
#[test]
fn the_index_is_built_only_where_the_link_is_slow() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = (d.path().join("a"), d.path().join("b"));
    let (old, new) = moved_then_tail(384);
    fs::write(&a, &new).unwrap();
    for (slow, similar) in [(false, 0), (true, 32)] {
        fs::write(&b, &old).unwrap();
        let to_target = if slow { throttle(400e3) } else { keep() };
        let rep = copy_judged(&a, &b, "none", false, to_target, keep()).target.unwrap();
        assert!(fs::read(&b).unwrap() == new, "the copy differs (slow: {slow})");
        assert_eq!(rep.blocks_total, rep.blocks_zero + rep.blocks_reused + rep.blocks_fetched);
        assert_eq!((rep.blocks_similar, rep.deltas_failed), (similar, 0), "slow: {slow}: {rep:?}");
        assert_eq!(rep.blocks_delta, 384 + similar, "slow: {slow}: {rep:?}");
    }
}

/// DST as a real file whose large reads (the similar blocks' index reads a
/// group at a time; the scan and the deltas read at most 32 KiB) take
/// [`SLOW_INDEX_READ`] each: an index thread starved of CPU.
#[derive(Debug)]
struct SlowIndexReads(Image);

const SLOW_INDEX_READ: Duration = Duration::from_secs(3);

impl Disk for SlowIndexReads {
    fn path(&self) -> &Path {
        self.0.path()
    }
    fn size(&self) -> u64 {
        Disk::size(&self.0)
    }
    fn is_block_device(&self) -> bool {
        Disk::is_block_device(&self.0)
    }
    fn pread(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        if buf.len() > 64 << 10 {
            std::thread::sleep(SLOW_INDEX_READ);
        }
        self.0.pread(buf, offset)
    }
    fn pwrite(&self, buf: &[u8], offset: u64) -> std::io::Result<usize> {
        self.0.pwrite(buf, offset)
    }
    fn punch_hole(&self, offset: u64, len: u64) -> std::io::Result<bool> {
        self.0.punch_hole(offset, len)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.0.flush()
    }
    fn drop_cache(&self) {
        Disk::drop_cache(&self.0)
    }
    fn evict(&self, offset: u64, len: u64) {
        self.0.evict(offset, len)
    }
}

/// A slow link, and an index that takes seconds to build: once the tail's
/// deltas are in and nothing else is awaited, the moved blocks wait at
/// most `similar::IDLE_WAIT` (half a second) of an idle link for it, then
/// go whole. Had they waited for the index, they would have come as 32
/// deltas, seconds later.
#[test]
fn blocks_wait_for_a_slow_index_only_while_the_link_has_work() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = (d.path().join("a"), d.path().join("b"));
    let (old, new) = moved_then_tail(384);
    fs::write(&a, &new).unwrap();
    fs::write(&b, &old).unwrap();
    let (to_target, to_source) =
        (chain(hide(CAP_SHORT_SUB_HASHES), throttle(400e3)), chain(hide(CAP_SHORT_SUB_HASHES), keep()));
    let o = relay::copy_onto_disk(
        &a,
        &b,
        &relay::source_options(BS as u32, "none"),
        relay::target_options(),
        to_target,
        to_source,
        |img| Box::new(SlowIndexReads(img)),
    );
    let rep = o.target.unwrap();
    assert!(fs::read(&b).unwrap() == new, "the copy differs");
    assert_eq!(rep.blocks_total, rep.blocks_zero + rep.blocks_reused + rep.blocks_fetched);
    assert_eq!((rep.blocks_similar, rep.blocks_delta, rep.deltas_failed), (0, 384, 0), "{rep:?}");
}

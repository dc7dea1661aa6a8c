//! What a new DST's host already holds, as a compact set the source asks
//! before it sends a key (capability
//! [`CAP_HELD_KEYS`](crate::wire::protocol::CAP_HELD_KEYS)).
//!
//! Why: onto a DST that holds nothing yet, the source sends the
//! [`KEY_LEN`]-byte key of every block of every group the target could
//! not settle, so that the target can look each one up in its references.
//! Most of those lookups fail: on the experiments' release cell 59,875 of
//! the 64,698 keys sent (0.97 MB, 1.7% of the copy) were of blocks no
//! reference held, which were then fetched anyway. The target now sends,
//! once, the set of keys it holds ([`HeldSet`]), and the source keys only
//! the blocks that set may hold (and zero blocks); the others it leaves
//! unkeyed, and the target fetches them without a key.
//!
//! The set is a Golomb-Rice coded set: each held key's first 8 bytes
//! (uniform: they are a digest's) are mapped into `[0, n x 2^k)` for `n`
//! keys, sorted, and the gaps written with a Rice code of parameter `k`:
//! about k + 1.6 bits a key, and a key not held passes with a chance of
//! 2^-k. [`choose_k`] weighs the two: each chance pass costs a key
//! ([`KEY_LEN`] bytes). A chance pass is harmless: the block gets its key
//! and is looked up and fetched as before.
//!
//! Unkeyed blocks are still checked before they are written: the answer
//! carries one [`run_key`] per run of consecutive unkeyed blocks (of all
//! their full digests, one key where the run's blocks would take one
//! each), the target asks for each such run whole, and checks it as it
//! arrives, as it checks a block against its key. On the release cell the
//! runs' keys take about 1,640 x 15 bytes where the blocks' took 59,875 x
//! 15. The group digest checks the group after, as always. A set that
//! lies (holding less than the target has) costs bytes, never a wrong
//! block.
//!
//! Every number in a `Holds` frame comes from the peer: [`HeldSet::decode`]
//! bounds the count by what the source allows and by the bits present,
//! and every value by the range, before anything is allocated by them.

use thiserror::Error;

use crate::blocks::digest::{key_of, Algorithm, Digest, Key, KEY_LEN};
use crate::wire::subgroup::{self, SubGroupError};

/// Largest Rice parameter: past it a chance pass costs less than a bit a
/// key would save.
pub const MAX_K: u8 = 24;

#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum HeldError {
    #[error("a held set of {got} keys, more than the {max} this copy allows")]
    TooMany { got: u64, max: u64 },
    #[error("a held set with Rice parameter {0}, above {MAX_K}")]
    Parameter(u8),
    #[error("a held set of {count} keys in a range of {range}")]
    Range { count: u64, range: u64 },
    #[error("a held set whose bits end after {got} of its {count} keys")]
    Truncated { got: u64, count: u64 },
    #[error("a held set with a key past its range of {range}")]
    PastRange { range: u64 },
    #[error("a held set with {0} bytes after its last key")]
    Trailing(usize),
}

/// The most keys a set may hold for an image of `blocks` blocks: a
/// target sends one only while it holds at most twice the image's blocks
/// (a larger set costs more than the keys it saves), so a peer can make
/// the source hold at most 16 bytes a block of the image (its own digests
/// take 32).
pub fn max_count(blocks: u64) -> u64 {
    blocks.saturating_mul(2).saturating_add(4096)
}

/// The set as it crosses the link (the fields of a `Holds` frame).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Encoded {
    /// Values lie in `[0, range)`; 0 for an empty set.
    pub range: u64,
    /// Rice parameter.
    pub k: u8,
    /// Distinct values coded.
    pub count: u32,
    /// The gaps, Rice coded, most significant bit first.
    pub bits: Vec<u8>,
}

/// A key's place in the set's hash space: its first 8 bytes (a key's, a
/// full digest's or a compact index entry's: they begin alike).
pub fn prefix(key: &[u8]) -> u64 {
    u64::from_be_bytes(key[..8].try_into().expect("keys are longer than 8 bytes"))
}

/// `prefix` scaled into `[0, range)`.
fn scaled(prefix: u64, range: u64) -> u64 {
    ((prefix as u128 * range as u128) >> 64) as u64
}

/// The Rice parameter for `held` keys when about `asked` keys will be
/// tested: each bit of k costs `held` bits, and halves the chance passes,
/// each of which costs a key.
pub fn choose_k(held: u64, asked: u64) -> u8 {
    if held == 0 {
        return 0;
    }
    // d/dk [held k / 8 + asked 2^-k KEY_LEN] = 0  =>  2^k = 8 ln2 KEY_LEN asked / held.
    let best = (8.0 * std::f64::consts::LN_2 * KEY_LEN as f64 * asked as f64 / held as f64).log2();
    best.round().clamp(1.0, MAX_K as f64) as u8
}

/// Code the set of keys whose first 8 bytes are `prefixes` (duplicates
/// allowed), for about `asked` lookups.
pub fn encode(prefixes: impl IntoIterator<Item = u64>, asked: u64) -> Encoded {
    let prefixes: Vec<u64> = prefixes.into_iter().collect();
    let n = prefixes.len() as u64;
    if n == 0 {
        return Encoded { range: 0, k: 0, count: 0, bits: Vec::new() };
    }
    let k = choose_k(n, asked);
    // (Saturated only past 2^40 keys: values then crowd a little more.)
    let range = n.saturating_mul(1 << k);
    let mut values: Vec<u64> = prefixes.iter().map(|&p| scaled(p, range)).collect();
    values.sort_unstable();
    values.dedup();
    let mut w = BitWriter::default();
    let mut last = 0;
    for &v in &values {
        let gap = v - last;
        last = v;
        for _ in 0..gap >> k {
            w.push(true);
        }
        w.push(false);
        for b in (0..k).rev() {
            w.push(gap >> b & 1 == 1);
        }
    }
    Encoded { range, k, count: values.len() as u32, bits: w.finish() }
}

/// The keys a target holds, as the source tests them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HeldSet {
    range: u64,
    values: Vec<u64>,
}

impl HeldSet {
    /// Decode a peer's set of at most `max_count` keys.
    pub fn decode(e: &Encoded, max_count: u64) -> Result<HeldSet, HeldError> {
        let count = e.count as u64;
        if count > max_count {
            return Err(HeldError::TooMany { got: count, max: max_count });
        }
        if e.k > MAX_K {
            return Err(HeldError::Parameter(e.k));
        }
        if count > e.range || (count > 0 && e.range == 0) {
            return Err(HeldError::Range { count, range: e.range });
        }
        // Each key takes at least k + 1 bits: no more are allocated than
        // the bits present can fill.
        let room = e.bits.len() as u64 * 8 / (e.k as u64 + 1);
        if count > room {
            return Err(HeldError::Truncated { got: room, count });
        }
        let mut r = BitReader { bits: &e.bits, at: 0 };
        let mut values = Vec::with_capacity(count as usize);
        let mut last = 0u64;
        for n in 0..count {
            let truncated = HeldError::Truncated { got: n, count };
            let mut q = 0u64;
            loop {
                match r.next() {
                    Some(true) => q += 1,
                    Some(false) => break,
                    None => return Err(truncated),
                }
            }
            let mut low = 0u64;
            for _ in 0..e.k {
                low = low << 1 | r.next().ok_or(truncated.clone())? as u64;
            }
            let gap = q.checked_shl(e.k as u32).filter(|g| g >> e.k == q).map(|g| g | low);
            let v = gap.and_then(|g| last.checked_add(g)).filter(|&v| v < e.range);
            last = v.ok_or(HeldError::PastRange { range: e.range })?;
            values.push(last);
        }
        let left = e.bits.len() - r.at.div_ceil(8);
        if left > 0 {
            return Err(HeldError::Trailing(left));
        }
        Ok(HeldSet { range: e.range, values })
    }

    /// Whether the target may hold a block with `key` (certainly not when
    /// false; by chance 2^-k when true).
    pub fn may_hold(&self, key: &Key) -> bool {
        self.range > 0 && self.values.binary_search(&scaled(prefix(key), self.range)).is_ok()
    }

    /// Keys in the set.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }
}

#[derive(Default)]
struct BitWriter {
    bytes: Vec<u8>,
    used: u32,
}

impl BitWriter {
    fn push(&mut self, bit: bool) {
        if self.used % 8 == 0 {
            self.bytes.push(0);
        }
        if bit {
            *self.bytes.last_mut().expect("pushed above") |= 0x80 >> (self.used % 8);
        }
        self.used = (self.used + 1) % 8;
    }

    fn finish(self) -> Vec<u8> {
        self.bytes
    }
}

struct BitReader<'a> {
    bits: &'a [u8],
    at: usize,
}

impl BitReader<'_> {
    fn next(&mut self) -> Option<bool> {
        let byte = *self.bits.get(self.at / 8)?;
        let bit = byte & (0x80 >> (self.at % 8)) != 0;
        self.at += 1;
        Some(bit)
    }
}

/// How the target settles one block of a group from an answer about it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Given {
    /// Its key: zero, in place, from a reference, or asked for.
    Key(Key),
    /// No key: its sub-group matched DST's; kept as DST holds it.
    Kept,
    /// No key: not in the held set; fetched, checked with its group.
    Unkeyed,
}

impl From<Option<Key>> for Given {
    fn from(k: Option<Key>) -> Given {
        k.map_or(Given::Kept, Given::Key)
    }
}

/// Domain separation: a run key never equals a block, sub-group or group
/// digest.
const RUN_LABEL: &[u8] = b"xenmig-unkeyed-run-v1";

/// The key of a run of unkeyed blocks, from their full digests in order.
pub fn run_key(algo: Algorithm, digests: &[Digest]) -> Key {
    key_of(&algo.digest_of_digests(RUN_LABEL, digests.iter()))
}

/// The runs of consecutive [`Given::Unkeyed`] blocks: (first, length),
/// numbered within the group.
pub fn unkeyed_runs(given: &[Given]) -> Vec<(usize, usize)> {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for (i, g) in given.iter().enumerate() {
        if *g != Given::Unkeyed {
            continue;
        }
        match runs.last_mut() {
            Some((first, len)) if *first + *len == i => *len += 1,
            _ => runs.push((i, 1)),
        }
    }
    runs
}

/// The source's answer to a `WantChangedKeys` when the target sent its
/// held set (the fields of a `HeldKeys` frame).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeldAnswer {
    /// Bit k set: sub-group k differs from the target's signature.
    pub differ: Vec<u8>,
    /// Blocks of those sub-groups.
    pub count: u32,
    /// Bit n set: the n-th of those is keyed (zero, or possibly held).
    pub keyed: Vec<u8>,
    /// The keys of exactly those.
    pub keys: Vec<Key>,
    /// A [`run_key`] per run of consecutive unkeyed blocks, in order.
    pub run_keys: Vec<Key>,
}

/// The answer for a group (block digests `own`) to the signature `sig`.
pub fn held_keys(
    algo: Algorithm,
    own: &[Digest],
    is_zero: impl Fn(usize) -> bool + Copy,
    subs: usize,
    sig: &subgroup::Signature,
    held: &HeldSet,
) -> Result<HeldAnswer, SubGroupError> {
    let (differ, all) = subgroup::differing(algo, own, is_zero, subs, sig)?;
    let marked = (0..own.len()).filter(|&i| subgroup::is_marked(&differ, i));
    // (`differing` gives a key per block of the differing sub-groups.)
    let count = all.len() as u32;
    let mut keyed = vec![0u8; all.len().div_ceil(8)];
    let mut keys = Vec::new();
    let mut given = vec![Given::Kept; own.len()];
    for (n, (i, key)) in marked.zip(all).enumerate() {
        if is_zero(i) || held.may_hold(&key) {
            keyed[n / 8] |= 1 << (n % 8);
            keys.push(key);
            given[i] = Given::Key(key);
        } else {
            given[i] = Given::Unkeyed;
        }
    }
    let run_keys = unkeyed_runs(&given).into_iter().map(|(a, n)| run_key(algo, &own[a..a + n])).collect();
    Ok(HeldAnswer { differ, count, keyed, keys, run_keys })
}

/// A run of unkeyed blocks as the target checks it: first block within
/// the group, length, key.
pub type UnkeyedRun = (usize, usize, Key);

/// What the target makes of a `HeldKeys` answer about a group of `blocks`
/// blocks in `subs` sub-groups: every length checked against the group.
pub fn held_given(blocks: usize, subs: usize, a: HeldAnswer) -> Result<(Vec<Given>, Vec<UnkeyedRun>), SubGroupError> {
    subgroup::check_differ(blocks, subs, &a.differ)?;
    let given = subgroup::hinted_given(blocks, &a.differ, a.count as usize, &a.keyed, a.keys)?;
    let given: Vec<Given> = given
        .into_iter()
        .enumerate()
        .map(|(i, k)| match k {
            Some(k) => Given::Key(k),
            None if subgroup::is_marked(&a.differ, i) => Given::Unkeyed,
            None => Given::Kept,
        })
        .collect();
    let runs = unkeyed_runs(&given);
    if runs.len() != a.run_keys.len() {
        return Err(SubGroupError::Keys { got: a.run_keys.len(), want: runs.len() });
    }
    Ok((given, runs.into_iter().zip(a.run_keys).map(|((f, n), k)| (f, n, k)).collect()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(seed: u64) -> Key {
        let d = crate::blocks::digest::Algorithm::Blake3.digest(&seed.to_le_bytes());
        crate::blocks::digest::key_of(&d)
    }

    proptest! {
        /// Every key coded is held; keys not coded pass about 2^-k of the time.
        #[test]
        fn a_coded_set_holds_its_keys(n in 0usize..3000, asked in 1u64..20_000, dup in 0usize..20) {
            let keys: Vec<Key> = (0..n as u64).map(key).collect();
            let prefixes = keys.iter().map(|k| prefix(k)).chain(keys.iter().take(dup).map(|k| prefix(k)));
            let e = encode(prefixes, asked);
            let set = HeldSet::decode(&e, n as u64).unwrap();
            prop_assert!(keys.iter().all(|k| set.may_hold(k)));
            if n >= 1000 {
                let others = (1u64 << 40..(1 << 40) + 20_000).map(key).filter(|k| set.may_hold(k)).count();
                let expect = 20_000.0 / (1u64 << e.k) as f64;
                prop_assert!((others as f64) < 3.0 * expect + 20.0, "{} passes, about {} expected", others, expect);
            }
        }

        /// Garbage never panics and never allocates past its bounds.
        #[test]
        fn garbage_is_an_error_or_a_bounded_set(range in any::<u64>(), k in 0u8..40, count in 0u32..5000,
                                                bits in proptest::collection::vec(any::<u8>(), 0..600)) {
            let e = Encoded { range, k, count, bits };
            if let Ok(set) = HeldSet::decode(&e, 4000) {
                prop_assert!(set.len() <= 4000 && set.len() == count as usize);
                prop_assert!(set.values.windows(2).all(|w| w[0] <= w[1]));
                prop_assert!(set.values.iter().all(|&v| v < range));
            }
        }
    }

    #[test]
    fn an_empty_set_holds_nothing() {
        let e = encode(std::iter::empty(), 100);
        assert_eq!((e.range, e.count, e.bits.len()), (0, 0, 0));
        let set = HeldSet::decode(&e, 0).unwrap();
        assert!(!set.may_hold(&key(1)));
    }

    #[test]
    fn a_set_costs_about_k_plus_two_bits_a_key() {
        let keys: Vec<Key> = (0..65_000).map(key).collect();
        let e = encode(keys.iter().map(|k| prefix(k)), 77_000);
        assert_eq!(e.k, 7, "release's numbers: 65,000 held, 77,000 asked");
        let bits = e.bits.len() as f64 * 8.0 / 65_000.0;
        assert!((8.0..9.2).contains(&bits), "{bits} bits a key");
    }

    #[test]
    fn lies_are_named() {
        let e = encode((0..100).map(|i| prefix(&key(i))), 100);
        let n = e.count as u64;
        let too_many = HeldSet::decode(&e, n - 1).unwrap_err();
        assert_eq!(too_many, HeldError::TooMany { got: n, max: n - 1 });
        let mut short = e.clone();
        short.bits.truncate(short.bits.len() / 2);
        assert!(matches!(HeldSet::decode(&short, n), Err(HeldError::Truncated { .. })));
        let mut long = e.clone();
        long.bits.extend([0, 0]);
        assert_eq!(HeldSet::decode(&long, n), Err(HeldError::Trailing(2)));
        let mut narrow = e.clone();
        narrow.range = 50;
        assert!(matches!(HeldSet::decode(&narrow, n), Err(HeldError::Range { .. } | HeldError::PastRange { .. })));
        let mut big_k = e;
        big_k.k = MAX_K + 1;
        assert_eq!(HeldSet::decode(&big_k, n), Err(HeldError::Parameter(MAX_K + 1)));
    }

    #[test]
    fn an_answer_keys_zero_and_held_blocks_only() {
        use crate::blocks::digest::Algorithm;
        let algo = Algorithm::Blake3;
        let own: Vec<Digest> = (0..40u64).map(|i| algo.digest(&i.to_le_bytes())).collect();
        let zero = |i: usize| i == 5;
        let held_set = HeldSet::decode(&encode([prefix(&own[3]), prefix(&own[20])], 40), 2).unwrap();
        // DST all zeros in the three sub-groups: all differ.
        let sig = subgroup::Signature { zero: vec![0b111], keys: vec![] };
        let answer = held_keys(algo, &own, zero, 3, &sig, &held_set).unwrap();
        assert_eq!((answer.differ.clone(), answer.count), (vec![0b111], 40));
        let (given, runs) = held_given(40, 3, answer.clone()).unwrap();
        // Every run's key is of its blocks' digests.
        assert!(!runs.is_empty());
        for (f, n, k) in &runs {
            assert!(given[*f..*f + *n].iter().all(|g| *g == Given::Unkeyed));
            assert_eq!(*k, run_key(algo, &own[*f..*f + *n]));
        }
        let mut fewer = answer;
        fewer.run_keys.pop();
        assert!(matches!(held_given(40, 3, fewer), Err(SubGroupError::Keys { .. })));
        for (i, g) in given.iter().enumerate() {
            let want = if matches!(i, 3 | 5 | 20) {
                Given::Key(crate::blocks::digest::key_of(&own[i]))
            } else if held_set.may_hold(&crate::blocks::digest::key_of(&own[i])) {
                continue; // (a chance pass: keyed too)
            } else {
                Given::Unkeyed
            };
            assert_eq!(*g, want, "block {i}");
        }
    }
}

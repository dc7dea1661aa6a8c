//! A changed block sent against its old version (capability
//! [`CAP_SUB_DELTA`](crate::wire::protocol::CAP_SUB_DELTA)).
//!
//! Why: on a return migration the target's DST holds the disk's old copy,
//! and most blocks it lacks are small edits of the block at the same place
//! there (a patched file, file system metadata). Only the target holds the
//! old bytes. It sends a [`signature`] of its old block (a 4-byte hash per
//! [`SUB`]-byte sub-block); the source answers with a [`encode`]d body: a
//! bitmap of the sub-blocks whose hash differs, then exactly those
//! sub-blocks. The target rebuilds the block with [`apply`] from its old
//! bytes and checks the result against the source's block key before it
//! counts; anything else (a hash collision, an old block changed meanwhile,
//! a damaged body) makes it fetch the whole block.
//!
//! Measured before it was built (`scripts/experiments/sub-block-delta.sh`,
//! docs/experiments.md): aligned 512-byte sub-blocks with 4-byte hashes sent
//! the fewest bytes on the return cell; an rsync-style search for shifted
//! data within the block found nothing more. A 4-byte hash is enough because
//! a collision costs a refetch, never a wrong block.
//!
//! Every length here comes from a peer and is checked before it is used: a
//! signature must have exactly one hash per sub-block of the source's block,
//! a body exactly one bit per sub-block (the bits past the last sub-block
//! zero) and exactly the bytes of the sub-blocks it marks.

use thiserror::Error;

/// Bytes per sub-block (the last one of a shorter block may be shorter).
pub const SUB: usize = 512;
/// Bytes of one sub-block's hash in a signature.
pub const HASH_LEN: usize = 4;
/// Bytes of one sub-block's hash in a short signature (`FetchDeltaShort`,
/// capability [`CAP_SHORT_SUB_HASHES`](crate::wire::protocol::CAP_SHORT_SUB_HASHES)):
/// the first ones of its [`HASH_LEN`]-byte hash.
///
/// Why two: a hash that matches by chance marks a changed sub-block as
/// unchanged; the rebuilt block then fails its key and is fetched whole
/// (one block, about 2 KB through the stream). At 2^-16 per changed
/// sub-block that costs on average a few hundred bytes per thousand deltas,
/// where the two bytes saved per sub-block are 16 KB.
pub const SHORT_HASH_LEN: usize = 2;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum DeltaError {
    #[error("a signature of {got} bytes for a block of {len} bytes, which needs {want}")]
    SignatureLength { got: usize, len: usize, want: usize },
    #[error("a delta of {got} bytes: {what}")]
    Body { got: usize, what: String },
}

/// Sub-blocks of a block of `len` bytes.
pub fn sub_count(len: usize) -> usize {
    len.div_ceil(SUB)
}

/// Whether a block of `len` bytes is worth a delta: with a single sub-block
/// a delta could only say "all of it".
pub fn worth_it(len: usize) -> bool {
    sub_count(len) >= 2
}

fn hash(sub: &[u8]) -> [u8; HASH_LEN] {
    let h = xxhash_rust::xxh3::xxh3_64(sub).to_le_bytes();
    [h[0], h[1], h[2], h[3]]
}

fn bitmap_len(n: usize) -> usize {
    n.div_ceil(8)
}

/// The signature of a block: one [`HASH_LEN`]-byte hash per sub-block.
pub fn signature(block: &[u8]) -> Vec<u8> {
    block.chunks(SUB).flat_map(hash).collect()
}

/// The short form of a signature: the first [`SHORT_HASH_LEN`] bytes of
/// each sub-block's hash.
pub fn short_signature(sig: &[u8]) -> Vec<u8> {
    sig.chunks(HASH_LEN).flat_map(|h| h.iter().take(SHORT_HASH_LEN).copied()).collect()
}

/// The body that rebuilds `new` from an old block whose signature is `sig`:
/// a bitmap (bit k set: sub-block k differs), then those sub-blocks in order.
pub fn encode(new: &[u8], sig: &[u8]) -> Result<Vec<u8>, DeltaError> {
    encode_by(new, sig, HASH_LEN)
}

/// [`encode`] against a [`short_signature`].
pub fn encode_short(new: &[u8], sig: &[u8]) -> Result<Vec<u8>, DeltaError> {
    encode_by(new, sig, SHORT_HASH_LEN)
}

fn encode_by(new: &[u8], sig: &[u8], hash_len: usize) -> Result<Vec<u8>, DeltaError> {
    let n = sub_count(new.len());
    if sig.len() != n * hash_len {
        return Err(DeltaError::SignatureLength { got: sig.len(), len: new.len(), want: n * hash_len });
    }
    let mut out = vec![0u8; bitmap_len(n)];
    for (k, (sub, old)) in new.chunks(SUB).zip(sig.chunks_exact(hash_len)).enumerate() {
        if hash(sub)[..hash_len] != *old {
            out[k / 8] |= 1 << (k % 8);
            out.extend_from_slice(sub);
        }
    }
    Ok(out)
}

/// The largest body [`encode`] makes for a block of `len` bytes (every
/// sub-block differs): a bound on what a target accepts.
pub fn max_body(len: usize) -> usize {
    bitmap_len(sub_count(len)) + len
}

/// The length of the body for a block of `len` bytes that `bytes` begins
/// with (a `Deltas` piece holds several bodies one after another): its
/// bitmap and the sub-blocks the bitmap marks. An error where `bytes` is
/// shorter than that, or the bitmap marks sub-blocks past the block's.
pub fn body_len(len: usize, bytes: &[u8]) -> Result<usize, DeltaError> {
    let n = sub_count(len);
    let bl = bitmap_len(n);
    let bad = |what: String| DeltaError::Body { got: bytes.len(), what };
    let Some(bits) = bytes.get(..bl) else {
        return Err(bad(format!("shorter than a bitmap of {bl} bytes")));
    };
    if n % 8 != 0 && bits[bl - 1] >> (n % 8) != 0 {
        return Err(bad(format!("marks sub-blocks past the block's {n}")));
    }
    let marked: usize = (0..n).filter(|k| bits[k / 8] & (1 << (k % 8)) != 0).map(|k| SUB.min(len - k * SUB)).sum();
    if bytes.len() < bl + marked {
        return Err(bad(format!("ends inside the {marked} bytes of sub-blocks its bitmap marks")));
    }
    Ok(bl + marked)
}

/// Most bytes of bodies a batch of deltas may call for, counting each
/// body at its largest ([`max_body`]): the answer to a `FetchDeltas`
/// (capability [`CAP_DELTA_BATCH`](crate::wire::protocol::CAP_DELTA_BATCH))
/// is one run, which holds at most
/// [`MAX_RUN_BYTES`](crate::wire::protocol::MAX_RUN_BYTES). The source
/// refuses a batch past it; [`Batch`] never makes one.
pub const MAX_BATCH_BODY: u64 = crate::wire::protocol::MAX_RUN_BYTES;

/// The target's deltas asked since its last flush, for one `FetchDeltas`.
///
/// Why: on the quick images' return copy 1,564 deltas were asked and
/// answered one frame each, 13 bytes of frame header and block number per
/// request and 18 per answer, about a tenth of what that copy sent besides
/// its payload; and each answer was a flushed piece of the stream of its
/// own. A batch takes one or two bytes a block each way, and its bodies
/// are one piece.
pub struct Batch {
    block_size: usize,
    asked: Vec<(u64, Vec<u8>)>,
    most: u64,
}

impl Batch {
    /// An empty batch for blocks of at most `block_size` bytes.
    pub fn new(block_size: usize) -> Batch {
        Batch { block_size, asked: Vec::new(), most: 0 }
    }

    /// Add block `block`, of `len` bytes, with its short signature. True
    /// when the batch is full: a block of the largest size might not fit
    /// any more.
    pub fn add(&mut self, block: u64, short_sig: Vec<u8>, len: usize) -> bool {
        self.asked.push((block, short_sig));
        self.most += max_body(len) as u64;
        self.most + max_body(self.block_size) as u64 > MAX_BATCH_BODY
    }

    /// The blocks batched (ascending) and their signatures one after
    /// another, leaving the batch empty; None if it was.
    pub fn take(&mut self) -> Option<(Vec<u64>, Vec<u8>)> {
        if self.asked.is_empty() {
            return None;
        }
        let mut asked = std::mem::take(&mut self.asked);
        self.most = 0;
        // (Requests are matched by block, not by order.)
        asked.sort_unstable_by_key(|(b, _)| *b);
        let sigs = asked.iter().flat_map(|(_, s)| s.iter().copied()).collect();
        Some((asked.into_iter().map(|(b, _)| b).collect(), sigs))
    }
}

/// Rebuild a block from its old bytes and a body from the peer. Only the
/// shape is checked here; the caller checks the result against the block's
/// key, since a hash collision or a changed old block yields a well-formed
/// but wrong block.
pub fn apply(old: &[u8], body: &[u8]) -> Result<Vec<u8>, DeltaError> {
    let n = sub_count(old.len());
    let bl = bitmap_len(n);
    let bad = |what: String| DeltaError::Body { got: body.len(), what };
    if body.len() < bl {
        return Err(bad(format!("shorter than its bitmap of {bl} bytes")));
    }
    let (bits, mut lits) = body.split_at(bl);
    if n % 8 != 0 && bits[bl - 1] >> (n % 8) != 0 {
        return Err(bad(format!("marks sub-blocks past the block's {n}")));
    }
    let mut out = old.to_vec();
    for (k, sub) in out.chunks_mut(SUB).enumerate() {
        if bits[k / 8] & (1 << (k % 8)) != 0 {
            if lits.len() < sub.len() {
                return Err(bad(format!("ends inside sub-block {k}")));
            }
            let (this, rest) = lits.split_at(sub.len());
            sub.copy_from_slice(this);
            lits = rest;
        }
    }
    if !lits.is_empty() {
        return Err(bad(format!("{} bytes past the sub-blocks it marks", lits.len())));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn only_changed_sub_blocks_travel() {
        let old: Vec<u8> = (0..4096u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut new = old.clone();
        new[1000] ^= 1; // sub-block 1
        new[4095] ^= 1; // sub-block 7
        let body = encode(&new, &signature(&old)).unwrap();
        assert_eq!(body.len(), 1 + 2 * SUB);
        assert_eq!(body[0], 0b1000_0010);
        assert_eq!(apply(&old, &body).unwrap(), new);
        // Identical: the bitmap alone.
        assert_eq!(encode(&old, &signature(&old)).unwrap(), vec![0]);
    }

    #[test]
    fn bodies_one_after_another_split_by_their_bitmaps() {
        let old: Vec<u8> = (0..4096u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut a = old.clone();
        a[600] ^= 1;
        let short_old = vec![3u8; 1300];
        let mut b = short_old.clone();
        b[1299] ^= 1; // the last sub-block, 276 bytes
        let (ba, bb) = (encode(&a, &signature(&old)).unwrap(), encode(&b, &signature(&short_old)).unwrap());
        let mut piece = ba.clone();
        piece.extend_from_slice(&bb);
        let first = body_len(4096, &piece).unwrap();
        assert_eq!(first, ba.len());
        assert_eq!(body_len(1300, &piece[first..]).unwrap(), bb.len());
        assert_eq!(apply(&short_old, &piece[first..]).unwrap(), b);
        // Cut short, or marking a sub-block past the block's three.
        assert!(body_len(4096, &piece[..first - 1]).is_err());
        assert!(body_len(1300, &[0b1000]).is_err());
        assert!(body_len(4096, &[]).is_err());
    }

    #[test]
    fn a_short_last_sub_block_and_a_partial_bitmap() {
        let old = vec![1u8; 1300]; // 3 sub-blocks: 512, 512, 276
        let mut new = old.clone();
        new[1299] = 2;
        let body = encode(&new, &signature(&old)).unwrap();
        assert_eq!(body.len(), 1 + 276);
        assert_eq!(apply(&old, &body).unwrap(), new);
        assert!(body.len() <= max_body(1300));
    }

    #[test]
    fn hostile_shapes_are_errors() {
        let old = vec![0u8; 4096];
        assert!(matches!(encode(&old, &[0; 3]), Err(DeltaError::SignatureLength { want: 32, .. })));
        assert!(apply(&old, &[]).is_err());
        // Marks sub-block 0 but carries 10 bytes of it.
        assert!(apply(&old, &[1; 11]).is_err());
        // Bits past the last sub-block of a 3-sub-block block.
        assert!(apply(&[0u8; 1300], &[0b1000]).is_err());
        // Bytes past what it marks.
        assert!(apply(&old, &[0, 9]).is_err());
    }

    /// `old` with each `(at, v)` written at `at` modulo its length.
    fn edited(old: &[u8], edits: Vec<(usize, u8)>) -> Vec<u8> {
        let mut new = old.to_vec();
        for (at, v) in edits {
            let i = at % new.len();
            new[i] = v;
        }
        new
    }

    proptest! {
        #[test]
        fn encode_then_apply_rebuilds_the_block(
            old in proptest::collection::vec(any::<u8>(), 1..5000),
            edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..8),
        ) {
            let new = edited(&old, edits);
            let body = encode(&new, &signature(&old)).unwrap();
            prop_assert!(body.len() <= max_body(new.len()));
            prop_assert_eq!(apply(&old, &body).unwrap(), new);
        }

        #[test]
        fn encode_short_then_apply_rebuilds_the_block_or_a_chance_match_is_caught_by_the_caller(
            old in proptest::collection::vec(any::<u8>(), 1..5000),
            edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..8),
        ) {
            let new = edited(&old, edits);
            let sig = short_signature(&signature(&old));
            prop_assert_eq!(sig.len(), sub_count(old.len()) * SHORT_HASH_LEN);
            let body = encode_short(&new, &sig).unwrap();
            prop_assert!(body.len() <= max_body(new.len()));
            let chance = old.chunks(SUB).zip(new.chunks(SUB)).any(|(o, n)| o != n && hash(o)[..2] == hash(n)[..2]);
            let refused = matches!(encode_short(&new, &sig[1..]), Err(DeltaError::SignatureLength { .. }));
            prop_assert!(refused);
            if !chance {
                prop_assert_eq!(apply(&old, &body).unwrap(), new);
            }
        }

        #[test]
        fn garbage_bodies_never_panic(old_len in 1usize..3000, body in proptest::collection::vec(any::<u8>(), 0..3000)) {
            let _ = apply(&vec![0u8; old_len], &body);
        }
    }
}

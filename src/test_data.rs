//! Test data shared by the unit tests: pseudo-random bytes that no codec
//! compresses (xorshift64), reproducible from a seed.

/// A xorshift64 generator; each call of [`Noise::bytes`] continues the
/// sequence.
pub(crate) struct Noise(u64);

impl Noise {
    /// `seed` must not be 0 (the generator would stay at 0).
    pub(crate) fn new(seed: u64) -> Noise {
        assert_ne!(seed, 0, "xorshift needs a non-zero seed");
        Noise(seed)
    }

    /// The next `len` bytes (the low byte of each step).
    pub(crate) fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len)
            .map(|_| {
                self.0 ^= self.0 << 13;
                self.0 ^= self.0 >> 7;
                self.0 ^= self.0 << 17;
                self.0 as u8
            })
            .collect()
    }
}

//! AFL target `frames`: see xenmig_fuzz::targets::frames and docs/fuzzing.md.
fn main() {
    afl::fuzz!(|data: &[u8]| {
        xenmig_fuzz::targets::frames(data);
    });
}

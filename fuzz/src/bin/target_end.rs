//! AFL target `target_end`: see xenmig_fuzz::targets::target_end and docs/fuzzing.md.
fn main() {
    afl::fuzz!(|data: &[u8]| {
        xenmig_fuzz::targets::target_end(data);
    });
}

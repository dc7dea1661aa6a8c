//! AFL target `source_end`: see xenmig_fuzz::targets::source_end and docs/fuzzing.md.
fn main() {
    afl::fuzz!(|data: &[u8]| {
        xenmig_fuzz::targets::source_end(data);
    });
}
